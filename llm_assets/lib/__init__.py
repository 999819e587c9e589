"""Plain-Python ML and data logic. Never imports dagster: every module here runs on its own."""
