"""The request path: app assembly, forwarding, stream relay, WebSocket, SSE, headers, errors, token
accounting (docs/architecture.md, "edge_proxy/proxy")."""
