"""HTTP composition root: builds the FastAPI app from the modules' routers."""

from .app import create_app

__all__ = ["create_app"]
