#!/bin/sh
# Make sure PostgreSQL server binaries exist for the embedded database.
for dir in $(command -v initdb 2>/dev/null | xargs -r dirname) /usr/lib/postgresql/*/bin /usr/local/pgsql/bin; do
    if [ -x "$dir/initdb" ] && [ -x "$dir/pg_ctl" ]; then
        exit 0
    fi
done
if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
    echo "installing PostgreSQL server binaries (apt-get install postgresql) for the embedded database"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null
    exit $?
fi
echo "PostgreSQL server binaries were not found. Install them (Debian/Ubuntu: sudo apt-get install postgresql)," >&2
echo "or run 'maas start --database-url sqlite:///PATH' (tests that need PostgreSQL are then skipped)." >&2
exit 0
