from preftune.cli import main

main()
