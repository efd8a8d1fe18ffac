"""Thin Tornado handlers: they translate HTTP and WebSocket to calls on the node."""
