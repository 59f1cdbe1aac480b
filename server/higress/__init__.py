"""Higress: the gateway's routing table written as Higress objects (McpBridge, Ingress, WasmPlugin)."""
