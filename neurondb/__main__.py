from neurondb.cli import main

main()
