# Slim runtime image: only what `python bot.py` needs, run as a non-root user.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    DATA_DIR=/data

WORKDIR /app
COPY requirements.txt .
RUN pip install --no-cache-dir -r requirements.txt

COPY bot.py ./
COPY cogs ./cogs
COPY services ./services

RUN useradd --system --uid 10001 --no-create-home kontext \
    && mkdir -p /data && chown kontext /data
USER kontext
VOLUME ["/data"]

# `docker stop` sends SIGTERM: the bot stops taking jobs, leaves running ones resumable, exits 0.
STOPSIGNAL SIGTERM
CMD ["python", "bot.py"]
