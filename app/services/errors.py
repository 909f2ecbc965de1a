"""Service-level failures, each mapped to one HTTP status by the API layer."""


class ServiceError(Exception):
    """status: the HTTP status the API answers with; code: the specific reason, in the error body."""

    status = 400
    code = "invalid_request"

    def __init__(self, message: str, headers: dict[str, str] | None = None, param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.message = message
        self.headers = headers or {}
        self.param = param
        if code is not None:
            self.code = code


class InvalidRequest(ServiceError):
    status, code = 400, "invalid_request"


class NotFound(ServiceError):
    status, code = 404, "not_found"


class Conflict(ServiceError):
    status, code = 409, "conflict"


class InvalidPromptSet(ServiceError):
    status, code = 422, "invalid_prompt_set"


class IdempotencyKeyReused(ServiceError):
    status, code = 422, "idempotency_key_reused"


class Overloaded(ServiceError):
    status, code = 503, "overloaded"


class Unavailable(ServiceError):
    status, code = 503, "unavailable"


class GenerationFailed(ServiceError):
    status, code = 500, "generation_failed"
