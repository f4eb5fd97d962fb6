// demo app
