"""Entry points: the API handler (all routes) and its HTTP plumbing (errors, auth, multipart)."""
