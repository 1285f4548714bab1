import sys

from captionbus.services.runtime.main import main

sys.exit(main())
