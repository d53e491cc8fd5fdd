# One image for the proxy and the workers; the command picks the role.
FROM python:3.11-slim
RUN apt-get update && apt-get install -y --no-install-recommends g++ && rm -rf /var/lib/apt/lists/*
WORKDIR /app
COPY . /app
RUN bash scripts/install.sh && ln -s /app/.venv/bin/quickdraft /usr/local/bin/quickdraft
ENV QUICKDRAFT_CACHE=/cache HF_HUB_OFFLINE=1
EXPOSE 50051 8000 50061
CMD ["quickdraft", "--help"]
