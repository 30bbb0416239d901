# MLflow tracking server image for infra/docker-compose.yml (PostgreSQL driver + S3 client).
FROM python:3.11-slim
RUN pip install --no-cache-dir "mlflow>=3.0,<4" "psycopg2-binary>=2.9" "boto3>=1.34"
COPY mlflow-team.sh /usr/local/bin/mlflow-team.sh
ENTRYPOINT ["bash", "/usr/local/bin/mlflow-team.sh"]
