from quickdraft.cli import main

main()
