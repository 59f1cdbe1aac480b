#!/bin/sh
# Tools the tests use beyond Python packages: OpenSSH's sshd for `maas worker add` over SSH, and
# MariaDB's server for the MariaDB store tier. Best effort: without them those tests skip themselves.
sh "$(dirname "$0")/ensure-mariadb.sh"
if command -v sshd >/dev/null 2>&1 || [ -x /usr/sbin/sshd ]; then
    exit 0
fi
if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
    echo "installing openssh-server for the SSH bootstrap test"
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends openssh-server >/dev/null) \
        || echo "could not install openssh-server; the SSH bootstrap test will be skipped" >&2
fi
exit 0
