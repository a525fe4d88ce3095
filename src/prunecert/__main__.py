from prunecert.cli import main

main()
