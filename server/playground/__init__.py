"""The built-in playground: a static page (static/: HTML, CSS and JavaScript modules, no build step) that the server
serves at GET / and /playground and that talks to this server's own API from the browser."""
