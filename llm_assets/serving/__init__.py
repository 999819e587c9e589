"""The HTTP model server (FastAPI + uvicorn) behind `llm-assets serve`."""
