# Placeholder: the deployment image (onnxruntime-gpu on a CUDA base) comes with the daemon issue.
FROM python:3.11-slim
WORKDIR /opt/valve-inspect
COPY pyproject.toml README.md ./
COPY service ./service
COPY models ./models
RUN pip install --no-cache-dir .
ENTRYPOINT ["valve-inspect"]
CMD ["run"]
