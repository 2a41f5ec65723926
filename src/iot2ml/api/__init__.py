"""HTTP composition root: the API's app and the serving process's app, built from the modules' routers."""

from .app import create_app
from .serving import create_serve_app

__all__ = ["create_app", "create_serve_app"]
