from focusdpo.cli import main

main()
