#!/bin/sh
# MariaDB's server binaries for the `mariadb` test tier (the suite starts its own server on a
# loopback port with a data folder of its own; nothing here starts or enables a service).
# Best effort: without them the `mariadb` tests skip themselves.
if command -v mariadbd >/dev/null 2>&1 || [ -x /usr/sbin/mariadbd ]; then
    exit 0
fi
if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
    echo "installing mariadb-server for the MariaDB test tier"
    # policy-rc.d: the package must not start a system-wide server on port 3306.
    policy=/usr/sbin/policy-rc.d
    made_policy=0
    if [ ! -e "$policy" ]; then
        printf '#!/bin/sh\nexit 101\n' > "$policy" && chmod +x "$policy" && made_policy=1
    fi
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends mariadb-server >/dev/null) \
        || echo "could not install mariadb-server; the MariaDB tests will be skipped" >&2
    [ "$made_policy" = 1 ] && rm -f "$policy"
fi
exit 0
