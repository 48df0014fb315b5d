"""One construct per concern; the stack passes resources between them explicitly."""
