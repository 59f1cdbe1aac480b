"""The SSH front door: the TUI served to SSH clients (`maas start --ssh-port`, `maas ssh serve`)."""
