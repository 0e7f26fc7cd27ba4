"""recovjax: measure how well pretrained networks recover from damage."""
