# Shared by scripts/demo and scripts/test: a virtual environment and a broker.
set -euo pipefail
cd "$(dirname "$0")/.."
AMQP_URL_GIVEN="${AMQP_URL:+yes}"  # a broker of the user's choosing: scripts/test uses it alone
export AMQP_URL="${AMQP_URL:-amqp://guest:guest@localhost:5672/%2F}"

# make_venv REQUIREMENTS: .venv, created if missing, with REQUIREMENTS installed.
make_venv() {
  [ -x .venv/bin/python ] || "${PYTHON:-python3}" -m venv .venv
  .venv/bin/python -m pip install --quiet --disable-pip-version-check -r "$1"
}

# broker_answers: exit 0 if the broker at AMQP_URL (its first URL) lets us in,
# 3 if it answers but refuses the credentials, 1 if nothing answers.
broker_answers() {
  .venv/bin/python -c '
import os, sys, pika
from pika.exceptions import ProbableAccessDeniedError, ProbableAuthenticationError
url = os.environ["AMQP_URL"].split(",amqp")[0]
try:
    pika.BlockingConnection(pika.URLParameters(url)).close()
except (ProbableAccessDeniedError, ProbableAuthenticationError):
    sys.exit(3)
except Exception:
    sys.exit(1)'
}

# refused: say that the broker at AMQP_URL refuses who we say we are, and stop.
refused() {
  echo "The broker at AMQP_URL answers but refuses its user name or password (or vhost)." >&2
  exit 1
}

# ensure_broker: the broker at AMQP_URL if it answers; else one started with
# docker compose or the local rabbitmq-server; else say how to get one.
ensure_broker() {
  local status=0
  broker_answers || status=$?
  [ "$status" = 0 ] && return
  [ "$status" = 3 ] && refused
  if docker info >/dev/null 2>&1; then
    echo "Starting RabbitMQ with docker compose..." >&2
    docker compose up -d --wait
  elif command -v rabbitmq-server >/dev/null; then
    echo "Starting the local rabbitmq-server..." >&2
    rabbitmq-server -detached
  else
    cat >&2 <<'MSG'
No RabbitMQ broker answers at AMQP_URL (default: localhost:5672), and neither a
Docker engine nor rabbitmq-server is here to start one. Either
  - start a broker: docker compose up -d --wait (on a machine with Docker), or
  - install RabbitMQ (https://www.rabbitmq.com/docs/download), or
  - point AMQP_URL at a broker: export AMQP_URL=amqp://user:password@host:5672/%2F
MSG
    exit 1
  fi
  for _ in $(seq 60); do
    broker_answers && return
    sleep 1
  done
  echo "RabbitMQ was started but does not answer at AMQP_URL after 60 s." >&2
  exit 1
}
