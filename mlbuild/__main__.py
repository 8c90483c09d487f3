from mlbuild.cli import main

main()
