from maas_tui.cli.main import main

main()
