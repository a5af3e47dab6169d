# Slim runtime image: only what `python bot.py` needs, run as a non-root user.
FROM python:3.11-slim

# HTTP_HOST/HTTP_PORT: the ops endpoint (/livez, /healthz, /metrics) listens on every interface
# inside the container; publish it on the host's loopback only (see docker-compose.yml).
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    DATA_DIR=/data \
    HTTP_HOST=0.0.0.0 \
    HTTP_PORT=8080

WORKDIR /app
COPY requirements.txt .
RUN pip install --no-cache-dir -r requirements.txt

# services/ holds the ops modules too (metrics, ops_server, log_format, usage_chart).
COPY bot.py ./
COPY cogs ./cogs
COPY services ./services
# The texts in other languages, read at start-up.
COPY locales ./locales

RUN useradd --system --uid 10001 --no-create-home kontext \
    && mkdir -p /data && chown kontext /data
USER kontext
VOLUME ["/data"]
EXPOSE 8080

# A liveness check (/livez, not /healthz): what acts on it, Swarm or an autoheal container,
# restarts the bot, which cures a hung process but not an outage at fal or Discord (it would only
# cut off the jobs in flight). The slim image has no curl: Python's http.client asks (never
# through a proxy set for the bot's own traffic). 200 exits 0; a 503, a refused connection or
# silence exits 1.
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import http.client as h, os, sys; c = h.HTTPConnection('127.0.0.1', int(os.environ['HTTP_PORT']), timeout=4); c.request('GET', '/livez'); sys.exit(c.getresponse().status != 200)"]

# `docker stop` sends SIGTERM: the bot stops taking jobs, leaves running ones resumable, exits 0.
STOPSIGNAL SIGTERM
CMD ["python", "bot.py"]
