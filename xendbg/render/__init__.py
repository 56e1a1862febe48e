"""Renderers: decoded dataclasses in, text or JSON out.  Renderers never read the target."""
