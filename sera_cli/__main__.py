from sera_cli.commands.app import main

if __name__ == "__main__":  # multiprocessing (vLLM) re-imports this module in its workers
    main()
