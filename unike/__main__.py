from unike.cli import main

main()
