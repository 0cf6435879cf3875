"""Deploying the plugins' server: Ray Serve (:mod:`.ray_serve`)."""
