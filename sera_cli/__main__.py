from sera_cli.app import main

main()
