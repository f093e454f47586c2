from medloupe.cli import main

main()
