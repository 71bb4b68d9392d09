"""`batmon`: the composition root. It wires the core (`bridge/`) and the facade (`http_api/`)
into the `batmon` command; neither of them imports it."""
