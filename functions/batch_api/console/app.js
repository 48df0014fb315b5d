// The batch-api web console. Plain JavaScript, no build step, no other origin.
//
// - The page lives at <base>/console and the API at <base>/v1 (<base> is "" locally and the stage
//   prefix on API Gateway), so every URL is derived from location.pathname: never an origin.
// - The API key is asked for once per tab, kept in sessionStorage only and sent as a Bearer token;
//   a 401 forgets it and asks again. Everything shown comes from the API with that key.
// - Every string from the server is rendered as text (textContent / text nodes), never as HTML.
"use strict";

(() => {
  const KEY_STORAGE = "batch-api-console-key";
  const REFRESH_MS = 2000;
  const ACTIVE = new Set(["validating", "in_progress", "finalizing", "cancelling"]);
  const CANCELLABLE = new Set(["validating", "in_progress", "finalizing"]);
  const TIMELINE = [
    ["created_at", "created"],
    ["in_progress_at", "in progress"],
    ["finalizing_at", "finalizing"],
    ["completed_at", "completed"],
    ["failed_at", "failed"],
    ["expired_at", "expired"],
    ["cancelling_at", "cancelling"],
    ["cancelled_at", "cancelled"],
  ];
  const MAX_ERROR_FILE_BYTES = 20 * 1024 * 1024; // larger error files are not grouped in the page
  const EXAMPLES_PER_GROUP = 3;

  const BASE = location.pathname.replace(/\/console\/?$/, "");
  const apiPath = (path) => BASE + path;

  const LIST_PAGE = 100; // the API's largest page
  const state = {
    key: null,
    token: 0, // bumped by every navigation: answers for an older view are dropped
    timer: null,
    samples: new Map(), // batch id -> [[seconds, done], ...] from successive polls, for the rate
    errorGroups: new Map(), // error file id -> groups (files never change once written)
    files: new Map(), // file id -> File object
    listed: LIST_PAGE, // how many of the newest batches the list shows ("Show older" adds a page)
    listAsked: 0,
  };

  const $ = (id) => document.getElementById(id);

  // ------------------------------------------------------------ DOM helpers (text only)

  function el(tag, props, ...children) {
    const node = document.createElement(tag);
    for (const [name, value] of Object.entries(props || {})) {
      if (value === null || value === undefined || value === false) continue;
      if (name === "class") node.className = value;
      else if (name === "on") for (const [event, fn] of Object.entries(value)) node.addEventListener(event, fn);
      else if (name === "value") node.value = value;
      else node.setAttribute(name, value === true ? "" : String(value));
    }
    for (const child of children.flat(Infinity)) {
      if (child === null || child === undefined || child === false) continue;
      node.append(child instanceof Node ? child : String(child)); // a string becomes a text node
    }
    return node;
  }

  function show(viewId) {
    for (const id of ["login-view", "list-view", "batch-view", "new-view"]) $(id).hidden = id !== viewId;
    const signedIn = viewId !== "login-view";
    $("nav").hidden = !signedIn;
    $("forget-key").hidden = !signedIn;
    $("key-hint").hidden = !signedIn;
    if (signedIn && state.key) $("key-hint").textContent = "key …" + state.key.slice(-4);
  }

  function notice(text) {
    $("notice").textContent = text || "";
    $("notice").hidden = !text;
  }

  function formatTime(seconds) {
    if (seconds === null || seconds === undefined) return "";
    const d = new Date(seconds * 1000);
    const pad = (n) => String(n).padStart(2, "0");
    return (
      `${d.getFullYear()}-${pad(d.getMonth() + 1)}-${pad(d.getDate())} ` +
      `${pad(d.getHours())}:${pad(d.getMinutes())}:${pad(d.getSeconds())}`
    );
  }

  function timeCell(seconds) {
    if (seconds === null || seconds === undefined) return el("span", { class: "muted" }, "—");
    return el("time", { datetime: new Date(seconds * 1000).toISOString() }, formatTime(seconds));
  }

  function formatDuration(seconds) {
    if (!Number.isFinite(seconds) || seconds < 0) return "—";
    const s = Math.round(seconds);
    if (s < 60) return `${s}s`;
    const m = Math.floor(s / 60);
    if (m < 60) return `${m}m ${String(s % 60).padStart(2, "0")}s`;
    return `${Math.floor(m / 60)}h ${String(m % 60).padStart(2, "0")}m`;
  }

  function formatBytes(n) {
    if (n === null || n === undefined) return "";
    if (n < 1024) return `${n} B`;
    if (n < 1024 * 1024) return `${(n / 1024).toFixed(1)} KiB`;
    return `${(n / 1024 / 1024).toFixed(1)} MiB`;
  }

  function statusBadge(status) {
    return el("span", { class: `status status-${status}`, "data-status": status }, status.replace("_", " "));
  }

  function metadataText(metadata) {
    return Object.entries(metadata || {})
      .map(([k, v]) => `${k}=${v}`)
      .join(", ");
  }

  // ------------------------------------------------------------ the API

  class ApiError extends Error {
    constructor(status, message, code) {
      super(message);
      this.status = status;
      this.code = code;
    }
  }

  // Same-origin requests only (connect-src 'self'). Redirects are followed: a large file's 302 to a
  // signed link works when the link is on this origin (the local server's /_blobs/); a link on another
  // origin (S3) is refused by the browser, and the caller says how to get the file instead.
  async function api(path, options = {}) {
    const headers = new Headers(options.headers || {});
    headers.set("Authorization", `Bearer ${state.key}`);
    let response;
    try {
      response = await fetch(apiPath(path), {
        ...options,
        headers,
        cache: "no-store",
        credentials: "omit",
        referrerPolicy: "no-referrer",
      });
    } catch {
      throw new ApiError(0, "The API could not be reached (or a redirect left this origin).", "network");
    }
    if (response.status === 401) {
      forgetKey("The API refused this key. Enter a valid key.");
      throw new ApiError(401, "The API refused this key.", "unauthorized");
    }
    if (!response.ok) {
      let message = `${response.status} ${response.statusText}`;
      let code = null;
      try {
        const body = await response.json();
        message = body.error.message || message;
        code = body.error.code || null;
      } catch {
        // not the error envelope: keep the status line
      }
      throw new ApiError(response.status, message, code);
    }
    return response;
  }

  const apiJson = async (path, options) => (await api(path, options)).json();

  async function fileObject(id) {
    if (!state.files.has(id)) state.files.set(id, await apiJson(`/v1/files/${encodeURIComponent(id)}`));
    return state.files.get(id);
  }

  // ------------------------------------------------------------ the key

  function forgetKey(message) {
    sessionStorage.removeItem(KEY_STORAGE);
    state.key = null;
    state.samples.clear();
    state.errorGroups.clear();
    state.files.clear();
    state.listed = LIST_PAGE;
    showLogin(message);
  }

  function showLogin(message) {
    state.token += 1;
    clearTimeout(state.timer);
    notice("");
    show("login-view");
    $("login-error").textContent = message || "";
    $("login-error").hidden = !message;
    $("api-key").value = "";
    $("api-key").focus();
  }

  async function signIn(event) {
    event.preventDefault();
    const key = $("api-key").value.trim();
    if (!key) return;
    state.key = key;
    try {
      await apiJson("/v1/batches?limit=1"); // a refused key comes back to the prompt (see api())
    } catch (error) {
      if (error.status !== 401) {
        state.key = null;
        showLogin(error.message);
      }
      return;
    }
    sessionStorage.setItem(KEY_STORAGE, key);
    route();
  }

  // ------------------------------------------------------------ routing

  function route() {
    state.token += 1;
    clearTimeout(state.timer);
    notice("");
    if (!state.key) {
      showLogin();
      return;
    }
    const hash = location.hash || "#/";
    const match = hash.match(/^#\/batches\/([^/]+)$/);
    if (match) showBatch(decodeURIComponent(match[1]), state.token);
    else if (hash === "#/new") showNew();
    else showList(state.token);
  }

  function schedule(fn) {
    clearTimeout(state.timer);
    state.timer = setTimeout(fn, REFRESH_MS);
  }

  function failed(error, token) {
    if (error.status === 401 || token !== state.token) return; // the key prompt is showing already
    notice(error.message);
  }

  // ------------------------------------------------------------ progress, rate, ETA

  function progressOf(batch) {
    const c = batch.request_counts || { total: 0, completed: 0, failed: 0 };
    return { done: c.completed + c.failed, total: c.total, failed: c.failed };
  }

  // requests per second: from this tab's successive polls (the last 30 s), else since in_progress_at
  function rateOf(batch, now) {
    if (batch.status !== "in_progress") return null;
    const { done } = progressOf(batch);
    const samples = (state.samples.get(batch.id) || []).filter(([t]) => now - t <= 30);
    samples.push([now, done]);
    state.samples.set(batch.id, samples);
    const [t0, d0] = samples[0];
    if (now - t0 >= 1 && done > d0) return (done - d0) / (now - t0);
    if (batch.in_progress_at && done > 0 && now > batch.in_progress_at) return done / (now - batch.in_progress_at);
    return null;
  }

  function progressCell(batch) {
    const { done, total, failed } = progressOf(batch);
    const bar = el("progress", {
      max: Math.max(total, 1),
      value: done,
      "data-done": done,
      "data-total": total,
      "aria-label": `${done} of ${total} requests done`,
    });
    const label = `${done} / ${total}` + (failed ? ` (${failed} failed)` : "");
    return el("div", { class: "progress" }, bar, el("span", { class: "progress-label" }, label));
  }

  // ------------------------------------------------------------ the list

  function showList(token) {
    show("list-view");
    refreshList(token);
  }

  // The newest `count` batches, a page of the API's at a time (`after` the last one of the page before).
  async function newestBatches(count) {
    const data = [];
    let after = null;
    let more = true;
    while (more && data.length < count) {
      const query = new URLSearchParams({ limit: String(Math.min(LIST_PAGE, count - data.length)) });
      if (after) query.set("after", after);
      const page = await apiJson(`/v1/batches?${query}`);
      data.push(...page.data);
      more = page.has_more && page.data.length > 0;
      after = page.last_id;
    }
    return { data, more };
  }

  async function refreshList(token) {
    const asked = ++state.listAsked; // an answer to an earlier ask (a shorter list) is dropped
    let page;
    try {
      page = await newestBatches(state.listed);
    } catch (error) {
      if (asked !== state.listAsked) return;
      failed(error, token);
      if (token === state.token && error.status !== 401) schedule(() => refreshList(token));
      return;
    }
    if (token !== state.token || asked !== state.listAsked) return;
    notice("");
    const now = Date.now() / 1000;
    $("batch-rows").replaceChildren(...page.data.map((batch) => batchRow(batch, now)));
    $("list-empty").hidden = page.data.length > 0;
    $("list-more").hidden = !page.more;
    $("list-shown").textContent = `Showing the ${page.data.length} newest batches.`;
    const active = page.data.some((batch) => ACTIVE.has(batch.status));
    $("list-updated").textContent =
      `updated ${formatTime(now)}` + (active ? `, refreshing every ${REFRESH_MS / 1000} s` : "");
    if (active) schedule(() => refreshList(token));
  }

  function showOlder() {
    state.listed += LIST_PAGE;
    clearTimeout(state.timer);
    refreshList(state.token);
  }

  function batchRow(batch, now) {
    const rate = rateOf(batch, now);
    const { done, total } = progressOf(batch);
    const eta = rate ? formatDuration((total - done) / rate) : "—";
    const href = `#/batches/${encodeURIComponent(batch.id)}`;
    return el(
      "tr",
      { "data-batch-id": batch.id, "data-status": batch.status },
      el("td", null, el("a", { href, class: "batch-link mono" }, batch.id)),
      el("td", null, statusBadge(batch.status)),
      el("td", null, timeCell(batch.created_at)),
      el("td", { class: "mono" }, batch.endpoint),
      el("td", null, progressCell(batch)),
      el("td", { class: "rate" }, rate ? `${rate.toFixed(1)}/s` : "—"),
      el("td", { class: "eta" }, eta),
      el("td", { class: "metadata" }, metadataText(batch.metadata)),
    );
  }

  // ------------------------------------------------------------ one batch

  function showBatch(id, token) {
    show("batch-view");
    $("batch-detail").replaceChildren(el("p", { class: "muted" }, "Loading…"));
    refreshBatch(id, token);
  }

  async function refreshBatch(id, token) {
    let batch;
    try {
      batch = await apiJson(`/v1/batches/${encodeURIComponent(id)}`);
    } catch (error) {
      if (token !== state.token || error.status === 401) return;
      if (error.status === 404) {
        $("batch-detail").replaceChildren(
          el("h1", { id: "not-found" }, "Batch not found"),
          el("p", null, "There is no batch ", el("code", null, id), " in this key's project."),
        );
      } else {
        failed(error, token);
        schedule(() => refreshBatch(id, token));
      }
      return;
    }
    if (token !== state.token) return;
    notice("");
    const groups = batch.error_file_id ? state.errorGroups.get(batch.error_file_id) : undefined;
    $("batch-detail").replaceChildren(...batchPage(batch, groups));
    if (ACTIVE.has(batch.status)) {
      schedule(() => refreshBatch(id, token));
    } else if (batch.error_file_id && groups === undefined) {
      loadErrorGroups(batch, token);
    }
  }

  function batchPage(batch, groups) {
    const { done, total } = progressOf(batch);
    const rate = rateOf(batch, Date.now() / 1000);
    const parts = [];
    parts.push(
      el(
        "div",
        { class: "heading" },
        el("h1", { class: "mono", id: "batch-id" }, batch.id),
        statusBadge(batch.status),
        el("span", { class: "spacer" }),
        CANCELLABLE.has(batch.status)
          ? el("button", { type: "button", id: "cancel-batch", class: "danger", on: { click: () => askCancel(batch) } }, "Cancel batch")
          : null,
      ),
    );
    parts.push(
      el(
        "div",
        { class: "grid" },
        card(
          "Summary",
          definitions([
            ["Endpoint", el("span", { class: "mono" }, batch.endpoint)],
            ["Model", batch.model || "—"],
            ["Window", batch.completion_window],
            ["Expires", timeCell(batch.expires_at)],
            ["Took", tookText(batch)],
          ]),
        ),
        card(
          "Requests",
          progressCell(batch),
          definitions([
            ["Total", String(total)],
            ["Completed", String(batch.request_counts.completed)],
            ["Failed", String(batch.request_counts.failed)],
            ["Rate", rate ? `${rate.toFixed(1)}/s` : "—"],
            ["ETA", rate ? formatDuration((total - done) / rate) : "—"],
          ]),
          { id: "counts" },
        ),
        card("Timeline", timeline(batch), { id: "timeline" }),
        batch.usage ? card("Usage (tokens)", usage(batch.usage), { id: "usage" }) : null,
        card("Metadata", metadata(batch.metadata), { id: "metadata" }),
        card("Files", files(batch), { id: "files", class: "card wide" }),
      ),
    );
    const lineErrors = (batch.errors && batch.errors.data) || [];
    if (lineErrors.length) parts.push(card("Validation errors", validationErrors(lineErrors), { id: "validation-errors" }));
    if (batch.error_file_id) parts.push(card("Failed requests by error", errorGroups(groups), { id: "error-groups" }));
    return parts;
  }

  function tookText(batch) {
    const end = batch.completed_at || batch.failed_at || batch.expired_at || batch.cancelled_at;
    if (!end) return ACTIVE.has(batch.status) ? `${formatDuration(Date.now() / 1000 - batch.created_at)} so far` : "—";
    return formatDuration(end - batch.created_at);
  }

  function card(title, ...children) {
    const last = children[children.length - 1];
    const props = last && !(last instanceof Node) && typeof last === "object" ? children.pop() : {};
    return el("section", { class: "card", ...props }, el("h2", null, title), ...children);
  }

  function definitions(rows) {
    return el("dl", null, rows.map(([term, value]) => [el("dt", null, term), el("dd", null, value)]));
  }

  function timeline(batch) {
    const steps = TIMELINE.filter(([field]) => batch[field]).sort((a, b) => batch[a[0]] - batch[b[0]]);
    return el(
      "ol",
      { class: "timeline" },
      steps.map(([field, label]) =>
        el("li", { "data-step": field.replace(/_at$/, "") }, el("span", { class: "step" }, label), " ", timeCell(batch[field])),
      ),
    );
  }

  function usage(u) {
    return definitions([
      ["Input", String(u.input_tokens)],
      ["  cached", String((u.input_tokens_details || {}).cached_tokens || 0)],
      ["Output", String(u.output_tokens)],
      ["  reasoning", String((u.output_tokens_details || {}).reasoning_tokens || 0)],
      ["Total", String(u.total_tokens)],
    ]);
  }

  function metadata(meta) {
    const entries = Object.entries(meta || {});
    if (!entries.length) return el("p", { class: "muted" }, "none");
    return definitions(entries.map(([k, v]) => [k, v]));
  }

  function files(batch) {
    const rows = [
      ["Input", batch.input_file_id, "input"],
      ["Output", batch.output_file_id, "output"],
      ["Errors", batch.error_file_id, "error"],
    ];
    return el(
      "ul",
      { class: "files" },
      rows.map(([label, id, kind]) =>
        el(
          "li",
          null,
          el("span", { class: "file-label" }, label),
          id
            ? [
                el("span", { class: "mono" }, id),
                el(
                  "button",
                  {
                    type: "button",
                    class: "secondary small",
                    id: `download-${kind}`,
                    on: { click: (event) => download(id, `${batch.id}_${kind}.jsonl`, batch.id, event.target) },
                  },
                  "Download",
                ),
              ]
            : el("span", { class: "muted" }, ACTIVE.has(batch.status) ? "not yet" : "none"),
        ),
      ),
    );
  }

  function validationErrors(errors) {
    return el(
      "table",
      { class: "errors" },
      el("thead", null, el("tr", null, el("th", null, "Line"), el("th", null, "Code"), el("th", null, "Message"), el("th", null, "Param"))),
      el(
        "tbody",
        null,
        errors.map((e) =>
          el(
            "tr",
            { class: "line-error" },
            el("td", { class: "line" }, e.line === null || e.line === undefined ? "—" : String(e.line)),
            el("td", { class: "mono" }, e.code || ""),
            el("td", null, e.message || ""),
            el("td", { class: "mono" }, e.param || ""),
          ),
        ),
      ),
    );
  }

  // ------------------------------------------------------------ failed requests, grouped

  // the error file's lines: {custom_id, response: {status_code, body: {error}}, error} as OpenAI writes them
  function errorOf(line) {
    const response = line.response || {};
    const bodyError = (response.body && response.body.error) || {};
    const own = line.error || {};
    const status = response.status_code;
    const code = own.code || bodyError.code || bodyError.type || (status ? `HTTP ${status}` : "unknown");
    const message = own.message || bodyError.message || "";
    return { code, status, message };
  }

  function groupErrors(text) {
    const groups = new Map();
    for (const raw of text.split("\n")) {
      if (!raw.trim()) continue;
      let line;
      try {
        line = JSON.parse(raw);
      } catch {
        continue;
      }
      const { code, status, message } = errorOf(line);
      if (!groups.has(code)) groups.set(code, { code, count: 0, statuses: new Set(), examples: [] });
      const group = groups.get(code);
      group.count += 1;
      if (status) group.statuses.add(status);
      if (group.examples.length < EXAMPLES_PER_GROUP) group.examples.push({ customId: line.custom_id, message });
    }
    return [...groups.values()].sort((a, b) => b.count - a.count);
  }

  async function loadErrorGroups(batch, token) {
    const id = batch.error_file_id;
    let groups;
    try {
      const file = await fileObject(id);
      if (file.bytes > MAX_ERROR_FILE_BYTES) {
        groups = { note: `The error file is ${formatBytes(file.bytes)}: download it to read it.` };
      } else {
        const response = await api(`/v1/files/${encodeURIComponent(id)}/content`);
        groups = groupErrors(await response.text());
      }
    } catch (error) {
      if (error.status === 401) return;
      groups = { note: `The error file could not be read: ${error.message}` };
    }
    state.errorGroups.set(id, groups);
    if (token !== state.token) return;
    const section = $("error-groups");
    if (section) section.replaceChildren(el("h2", null, "Failed requests by error"), errorGroups(groups));
  }

  function errorGroups(groups) {
    if (groups === undefined) return el("p", { class: "muted" }, "Reading the error file…");
    if (!Array.isArray(groups)) return el("p", { class: "muted" }, groups.note);
    if (!groups.length) return el("p", { class: "muted" }, "The error file is empty.");
    return el(
      "div",
      { class: "groups" },
      groups.map((group) =>
        el(
          "div",
          { class: "error-group", "data-code": group.code },
          el(
            "h3",
            null,
            el("span", { class: "mono" }, group.code),
            " ",
            el("span", { class: "count" }, `${group.count} request${group.count === 1 ? "" : "s"}`),
            group.statuses.size ? el("span", { class: "muted" }, ` (HTTP ${[...group.statuses].join(", ")})`) : null,
          ),
          el(
            "ul",
            { class: "examples" },
            group.examples.map((ex) =>
              el("li", null, el("span", { class: "mono custom-id" }, ex.customId || "—"), ": ", el("span", { class: "message" }, ex.message)),
            ),
          ),
        ),
      ),
    );
  }

  // ------------------------------------------------------------ downloads

  // A signed link first, for a file of any size: the browser downloads from it as from any page,
  // wherever the storage is (S3 on AWS, which `connect-src 'self'` keeps fetch() away from). Storage
  // that signs no links: the bytes through the API.
  async function download(fileId, fallbackName, batchId, button) {
    button.disabled = true;
    try {
      let name = fallbackName;
      try {
        name = (await fileObject(fileId)).filename || fallbackName;
      } catch (error) {
        if (error.status === 401) return;
      }
      let link = null;
      try {
        link = await apiJson(`/v1/files/${encodeURIComponent(fileId)}/link`);
      } catch (error) {
        if (error.status === 401) return;
        if (error.code !== "link_unavailable") {
          notice(`Download failed: ${error.message}`);
          return;
        }
      }
      if (link) {
        save(link.url, name);
        return;
      }
      let response;
      try {
        response = await api(`/v1/files/${encodeURIComponent(fileId)}/content`);
      } catch (error) {
        if (error.code === "network") {
          notice(
            `${fileId} could not be fetched through this page. Download it with: batch-api download ${batchId}`,
          );
        } else if (error.status !== 401) {
          notice(`Download failed: ${error.message}`);
        }
        return;
      }
      const url = URL.createObjectURL(await response.blob());
      save(url, name);
      setTimeout(() => URL.revokeObjectURL(url), 60000);
    } finally {
      button.disabled = false;
    }
  }

  function save(href, name) {
    const link = el("a", { href, download: name, rel: "noreferrer", hidden: true });
    document.body.append(link);
    link.click();
    link.remove();
  }

  // ------------------------------------------------------------ cancel

  let cancelling = null;

  function askCancel(batch) {
    cancelling = batch.id;
    $("cancel-text").textContent =
      `Batch ${batch.id} stops: requests not yet run are not run, and the results so far are kept.`;
    $("cancel-dialog").showModal();
  }

  async function confirmCancel() {
    const id = cancelling;
    $("cancel-dialog").close();
    if (!id) return;
    cancelling = null;
    try {
      await apiJson(`/v1/batches/${encodeURIComponent(id)}/cancel`, { method: "POST" });
    } catch (error) {
      if (error.status !== 401) notice(`Cancel failed: ${error.message}`);
      return;
    }
    route(); // redraw the batch with its new status
  }

  // ------------------------------------------------------------ upload and create

  function showNew() {
    show("new-view");
    $("new-status").hidden = true;
  }

  async function firstLineUrl(file) {
    const head = await file.slice(0, 1024 * 1024).text();
    const first = head.split("\n").find((line) => line.trim());
    if (!first) throw new Error("The file is empty.");
    let request;
    try {
      request = JSON.parse(first);
    } catch {
      throw new Error("Line 1 is not valid JSON (or longer than 1 MiB).");
    }
    if (!request || typeof request.url !== "string") throw new Error("Line 1 has no url.");
    return request.url;
  }

  function parseMetadata(text) {
    const metadata = {};
    for (const [index, raw] of text.split("\n").entries()) {
      const line = raw.trim();
      if (!line) continue;
      const at = line.indexOf("=");
      if (at <= 0) throw new Error(`Metadata line ${index + 1} is not key=value.`);
      metadata[line.slice(0, at).trim()] = line.slice(at + 1).trim();
    }
    return Object.keys(metadata).length ? metadata : null;
  }

  function newStatus(text, isError) {
    $("new-status").textContent = text;
    $("new-status").className = isError ? "error" : "muted";
    $("new-status").hidden = false;
  }

  async function onFileChosen() {
    const file = $("new-file").files[0];
    if (!file) return;
    try {
      const url = await firstLineUrl(file);
      $("new-endpoint").textContent = `Endpoint: ${url} (from line 1)`;
    } catch (error) {
      $("new-endpoint").textContent = error.message;
    }
  }

  async function createBatch(event) {
    event.preventDefault();
    const file = $("new-file").files[0];
    if (!file) return;
    const button = $("new-submit");
    button.disabled = true;
    try {
      let endpoint;
      let meta;
      try {
        endpoint = await firstLineUrl(file);
        meta = parseMetadata($("new-metadata").value);
      } catch (error) {
        newStatus(error.message, true);
        return;
      }
      newStatus(`Uploading ${file.name} (${formatBytes(file.size)})…`, false);
      const form = new FormData();
      form.append("purpose", "batch");
      form.append("file", file, file.name);
      const uploaded = await apiJson("/v1/files", { method: "POST", body: form });
      newStatus(`Uploaded ${uploaded.id}; creating the batch…`, false);
      const body = { input_file_id: uploaded.id, endpoint, completion_window: "24h" };
      if (meta) body.metadata = meta;
      const batch = await apiJson("/v1/batches", {
        method: "POST",
        headers: { "Content-Type": "application/json" },
        body: JSON.stringify(body),
      });
      $("new-form").reset();
      location.hash = `#/batches/${encodeURIComponent(batch.id)}`;
    } catch (error) {
      if (error.status !== 401) newStatus(error.message, true);
    } finally {
      button.disabled = false;
    }
  }

  // ------------------------------------------------------------ start

  function start() {
    $("login-form").addEventListener("submit", signIn);
    $("forget-key").addEventListener("click", () => {
      location.hash = "#/";
      forgetKey();
    });
    $("list-older").addEventListener("click", showOlder);
    $("new-form").addEventListener("submit", createBatch);
    $("new-file").addEventListener("change", onFileChosen);
    $("cancel-confirm").addEventListener("click", confirmCancel);
    $("cancel-keep").addEventListener("click", () => {
      cancelling = null;
      $("cancel-dialog").close();
    });
    window.addEventListener("hashchange", route);
    state.key = sessionStorage.getItem(KEY_STORAGE);
    route();
  }

  start();
})();
