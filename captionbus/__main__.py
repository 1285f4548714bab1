from captionbus.cli import main

main()
