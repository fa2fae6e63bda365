def application(environ, start_response)  # deliberately broken: no colon
    return []
