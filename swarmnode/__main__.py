from swarmnode.cli import main

main()
