"""Service-level failures, each mapped to one HTTP status by the API layer."""


class ServiceError(Exception):
    status = 400
    type = "invalid_request"

    def __init__(self, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.message = message
        self.headers = headers or {}


class InvalidRequest(ServiceError):
    status, type = 400, "invalid_request"


class NotFound(ServiceError):
    status, type = 404, "not_found"


class Conflict(ServiceError):
    status, type = 409, "conflict"


class InvalidPromptSet(ServiceError):
    status, type = 422, "invalid_prompt_set"


class IdempotencyKeyReused(ServiceError):
    status, type = 422, "idempotency_key_reused"


class Overloaded(ServiceError):
    status, type = 503, "overloaded"


class Unavailable(ServiceError):
    status, type = 503, "unavailable"


class GenerationFailed(ServiceError):
    status, type = 500, "generation_failed"
