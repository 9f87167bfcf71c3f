"""Everything handed the WebUI's modules (host adapter, job runner, grid renderer, WebUI taggers, path policy).
Nothing here imports a WebUI module itself: ``scripts/`` passes them in."""
