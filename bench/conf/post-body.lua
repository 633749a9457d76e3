-- Turns every wrk request into a POST of the body below (wrk adds the Content-Length).
wrk.method = "POST"
wrk.body = string.rep("b", @BODY_BYTES@)
wrk.headers["Content-Type"] = "application/octet-stream"
