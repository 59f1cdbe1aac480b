#!/bin/sh
# The Docker tier's tools: a Docker engine (Debian's docker.io: dockerd, containerd, runc) and a registry
# (Debian's docker-registry: distribution 2.8). Installed with apt as root when missing; best effort:
# without them the tier's tests skip themselves with the reason.
#
# No daemon is started here, and none may be left running on the default socket: the packages' own
# services are held back during the install (a policy-rc.d that says no, only while we install and only
# where the machine has none), because an engine on /var/run/docker.sock would change what every other
# test sees (`--runtime auto` asks it) and its iptables rules cut the Ray tier's network namespaces.
# The tier's fixture (tests/docker_tier.py) starts its own dockerd and registry on private sockets/ports.
missing=""
command -v dockerd >/dev/null 2>&1 || missing="$missing docker.io"
command -v docker-registry >/dev/null 2>&1 || [ -x /usr/bin/docker-registry ] || missing="$missing docker-registry"
[ -z "$missing" ] && exit 0
if ! command -v apt-get >/dev/null 2>&1 || [ "$(id -u)" != 0 ]; then
    echo "the Docker tier needs$missing (Debian/Ubuntu: sudo apt-get install$missing); its tests will be skipped" >&2
    exit 0
fi
policy=/usr/sbin/policy-rc.d
placed=""
if [ ! -e "$policy" ]; then
    printf '#!/bin/sh\n# placed by maas scripts/ensure-docker.sh during an install; removed after it\nexit 101\n' > "$policy"
    chmod 755 "$policy"
    placed=1
fi
echo "installing$missing for the Docker tier (no service is started)"
(apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $missing >/dev/null) \
    || echo "could not install$missing; the Docker tier's tests will be skipped" >&2
[ -n "$placed" ] && rm -f "$policy"
exit 0
