# Shared helpers for the project's scripts. Source it; it defines functions only.

# ensure_packages PKG...: installs the Debian packages that are missing (needs root, as on the
# project's machines); prints what it does.
ensure_packages() {
    local missing=()
    for p in "$@"; do
        # Installed means status `install ok installed` (or `hold ok installed`): `dpkg -s` also
        # succeeds for a removed package whose configuration files are left (`deinstall ok config-files`).
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q ' ok installed$' || missing+=("$p")
    done
    if [ ${#missing[@]} -gt 0 ]; then
        echo "==> installing ${missing[*]} (apt-get)"
        local sudo=""
        [ "$(id -u)" = 0 ] || sudo="sudo"
        $sudo apt-get update -qq
        DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${missing[@]}" >/dev/null
    fi
}

# free_port: prints a free TCP port on 127.0.0.1.
free_port() {
    python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1]); s.close()'
}

# port_free PORT: succeeds when nothing listens on 127.0.0.1:PORT (binds it as a server would).
port_free() {
    python3 -c 'import socket, sys
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("127.0.0.1", int(sys.argv[1])))
s.close()' "$1" 2>/dev/null
}

# wait_for_redis PORT: waits (bounded) until redis on PORT answers PING.
wait_for_redis() {
    local port=$1
    for _ in $(seq 1 200); do
        if redis-cli -h 127.0.0.1 -p "$port" ping 2>/dev/null | grep -q PONG; then return 0; fi
        sleep 0.05
    done
    echo "redis on port $port did not start" >&2
    return 1
}

# wait_for_http URL: waits (bounded, 60 s) until URL answers 200.
wait_for_http() {
    local url=$1
    for _ in $(seq 1 600); do
        if curl -fsS -o /dev/null "$url" 2>/dev/null; then return 0; fi
        sleep 0.1
    done
    echo "$url did not become ready" >&2
    return 1
}
