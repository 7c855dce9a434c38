from swarmnode._entry import main

main()
