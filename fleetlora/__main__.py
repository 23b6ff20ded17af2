from fleetlora.cli import main

main()
