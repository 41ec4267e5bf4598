"""fewstep HTTP server: FastAPI app, routes, metrics, config and CLI."""
__version__ = "0.1.0"
