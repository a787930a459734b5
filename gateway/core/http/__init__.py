"""The one HTTP server: routes, limits, deadlines, WebSocket routes."""
