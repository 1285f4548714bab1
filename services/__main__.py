import sys

from services.runtime.main import main

sys.exit(main())
