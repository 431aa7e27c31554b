"""`sdtorch serve`: AUTOMATIC1111's HTTP API (/sdapi/v1) and a web page, on FastAPI + uvicorn (the `serve` extra).

    app.py          routes, auth, body limit, error answers
    schemas.py      A1111's request bodies (field names and defaults)
    mapping.py      A1111 fields -> pipeline keyword arguments; results -> A1111's answer
    worker.py       one model worker and its FIFO queue, progress, interrupt/skip
    preview.py      the live preview of the running step's latent
    checkpoints.py  the models a client may name
    static/         the web page (plain HTML and JavaScript, no build step, no CDN)
"""
