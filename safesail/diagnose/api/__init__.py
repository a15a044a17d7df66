"""The JSON API, one endpoint per module; `ROUTERS` lists them for the app."""

from safesail.diagnose.api import compare, diagnose, info, latent, presets, steer, stream

ROUTERS = [info.router, diagnose.router, compare.router, latent.router, presets.router, stream.router, steer.router]
