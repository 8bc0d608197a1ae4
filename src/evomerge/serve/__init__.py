"""evomerge.serve: any model dir as an OpenAI-compatible endpoint (`evomerge serve`).

engine.py generates batches of jobs with the evaluator's batched decoding; scheduler.py gathers requests
that arrive together into one batch on a worker thread that owns the model; protocol.py validates the
OpenAI request bodies; app.py is the FastAPI app; server.py runs it (uvicorn, or a thread for tests).
FastAPI and uvicorn (the `serve` extra) are imported only when an app is built or run.
"""
